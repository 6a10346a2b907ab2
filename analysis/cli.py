"""Command line: `python -m analysis <command> ...`. Every dashboard action has a command here.

Errors the user can fix exit with status 2 and one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.models import ModelLoadError


class UsageError(ValueError):
    """Bad option value; printed as one line."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), 'gemma3', a folder or a HF id")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true", help="run code from the model's repository (off by default)")


def cmd_models(args: argparse.Namespace) -> int:
    from analysis.models import PACKAGED, ensure_converted  # noqa: PLC0415

    for key, pm in PACKAGED.items():
        line = f"{key:10s} {pm.title:28s} {pm.quantization}"
        if args.convert:
            line += f"  -> {ensure_converted(key)}"
        print(line)
    return 0


def _load_for_cli(args: argparse.Namespace):
    from analysis.models import load_model  # noqa: PLC0415

    return load_model(args.model, device=None if args.device == "auto" else args.device,
                      dtype=None if args.dtype == "auto" else args.dtype, trust_remote_code=args.trust_remote_code)


def _print_progress(message: str, fraction: float) -> None:
    print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def _allocation_metrics(args: argparse.Namespace, loaded):
    if args.method in ("alphapruning", "farms"):
        from analysis.spectra import analyze  # noqa: PLC0415

        return analyze(loaded.model, fit=args.fit, farms=args.method == "farms", progress=_print_progress).metrics
    from analysis.models import layer_table  # noqa: PLC0415

    return layer_table(loaded.model)


def _owl_outliers(args: argparse.Namespace, loaded) -> dict[int, float]:
    from analysis.data import calibration_batches, load_text, split_text  # noqa: PLC0415
    from analysis.pruning import collect_outlier_ratios  # noqa: PLC0415

    text = load_text(args.calib)
    if args.calib == "default":
        text = split_text(text)[0]  # the half of the embedded corpus reserved for calibration
    calib = calibration_batches(loaded.tokenizer, text, n_samples=args.nsamples, seqlen=args.seqlen)
    return collect_outlier_ratios(loaded.model, calib, threshold_m=args.owl_threshold, progress=_print_progress)


def _print_allocation(alloc, metrics, metric: str | None) -> None:
    import pandas as pd  # noqa: PLC0415

    from analysis.allocation import block_table  # noqa: PLC0415

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
    print(f"method {alloc.method}: target {alloc.sparsity:.4f}, achieved {alloc.achieved:.6f} "
          f"(parameter-weighted over {len(alloc.per_layer)} prunable matrices)")


def cmd_allocate(args: argparse.Namespace) -> int:
    from analysis.allocation import allocate, check_settings, custom_allocation, parse_points  # noqa: PLC0415

    if args.method == "custom":
        if not args.points:
            raise UsageError("--method custom needs --points, e.g. --points 0:0.5,0.5:0.7,1:0.8")
        points = parse_points(args.points)
        if args.sparsity is None and not args.as_drawn:
            raise UsageError("--sparsity is required unless --as-drawn")
    elif args.sparsity is None:
        raise UsageError("--sparsity is required")
    check_settings(args.method, args.sparsity, args.epsilon, args.metric, args.granularity, args.owl_lambda)
    loaded = _load_for_cli(args)
    metrics = _allocation_metrics(args, loaded)
    if args.method == "custom":
        alloc = custom_allocation(points, metrics, sparsity=args.sparsity, normalize=not args.as_drawn,
                                  model=args.model)
    else:
        outliers = _owl_outliers(args, loaded) if args.method == "owl" else None
        alloc = allocate(metrics, args.sparsity, method=args.method, epsilon=args.epsilon, metric=args.metric,
                         granularity=args.granularity, outlier_ratios=outliers, owl_lambda=args.owl_lambda,
                         model=args.model)
    if args.method in ("alphapruning", "farms"):
        alloc.params["fit"] = args.fit
    _print_allocation(alloc, metrics, args.metric if args.method in ("alphapruning", "farms") else None)
    if args.out:
        print(f"wrote {alloc.save(args.out)}")
    return 0


def _add_allocate_parser(sub) -> None:
    from analysis.allocation import METHODS, METRIC_DIRECTION  # noqa: PLC0415

    p = sub.add_parser("allocate", help="layerwise sparsity (uniform, alphapruning, farms, owl, custom) to JSON")
    _add_model_args(p)
    p.add_argument("--method", default="alphapruning", choices=METHODS)
    p.add_argument("--sparsity", type=float, default=None, help="target fraction of pruned weights, in [0, 0.99]")
    p.add_argument("--epsilon", type=float, default=0.3, help="alphapruning/farms spread: ratios in [S(1-eps), S(1+eps)]")
    p.add_argument("--metric", default="alpha", choices=list(METRIC_DIRECTION), help="per-matrix metric (alphapruning/farms)")
    p.add_argument("--granularity", default="block", choices=["block", "layer"], help="one ratio per block or per matrix")
    p.add_argument("--fit", default="peak", help="power-law xmin rule: peak, median or scan")
    p.add_argument("--points", default=None, help="custom curve control points depth:sparsity, e.g. 0:0.5,0.5:0.7,1:0.8")
    p.add_argument("--as-drawn", action="store_true", help="custom: apply the curve as drawn, report its budget")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="owl: half-range of the sparsities around the target")
    p.add_argument("--owl-threshold", type=float, default=5.0, help="owl: outlier = |activation x weight| > M x mean")
    p.add_argument("--calib", default="default", help="owl calibration text: default, wikitext2:valid or a .txt path")
    p.add_argument("--nsamples", type=int, default=16, help="owl: calibration sequences")
    p.add_argument("--seqlen", type=int, default=256, help="owl: tokens per calibration sequence")
    p.add_argument("--out", default=None, help="write the allocation JSON here")
    p.set_defaults(func=cmd_allocate)


# --------------------------------------------------------------------------------------------
# prune / eval / runs


def _print_ppl(label: str):
    def show(u) -> None:
        print(f"[{u.windows_done / u.windows_total:4.0%}] {label} perplexity {u.ppl:.3f} after "
              f"{u.windows_done}/{u.windows_total} windows ({u.tokens} tokens)", file=sys.stderr, flush=True)
    return show


def _check_prune_args(args: argparse.Namespace):
    """Validate cheap options before loading anything; returns (n, m) or None."""
    from analysis.pruning import METHODS, parse_nm  # noqa: PLC0415

    if args.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}")
    nm = parse_nm(args.nm)
    if nm is None and not 0.0 < args.sparsity <= 0.99:
        raise UsageError(f"--sparsity must be in (0, 0.99], got {args.sparsity}")
    if not 0.0 <= args.epsilon < 1.0:
        raise UsageError(f"--epsilon must be in [0, 1), got {args.epsilon}")
    _check_data_args(args, args.eval)
    from analysis.runs import ALLOCATIONS  # noqa: PLC0415

    if nm is None and args.allocation not in ALLOCATIONS and not Path(args.allocation).expanduser().is_file():
        raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)} or an allocation JSON file; "
                         f"'{args.allocation}' is neither.")
    return nm


def _check_data_args(args: argparse.Namespace, eval_source: str) -> None:
    """The calibration/evaluation options, including that the texts can exist, before any model loads."""
    from analysis.data import text_source_problem  # noqa: PLC0415

    for name in ("nsamples", "seqlen", "eval_seqlen"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer")
    for name in ("max_windows", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer")
    for flag, source in (("--calib", args.calib), ("evaluation text", eval_source)):
        if problem := text_source_problem(source):
            raise UsageError(f"{flag}: {problem}")


def _prune_config(args: argparse.Namespace, nm, alloc, data_info: dict, loaded) -> dict:
    return {"model": args.model, "model_title": loaded.info.title, "method": args.method,
            "allocation": alloc.method if nm is None else "n:m", "allocation_source": args.allocation,
            "sparsity": alloc.sparsity, "epsilon": args.epsilon, "nm": list(nm) if nm else None, **data_info,
            "seed": args.seed, "device": loaded.info.device, "dtype": loaded.info.dtype}


def cmd_prune(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from analysis.evaluation import perplexity  # noqa: PLC0415
    from analysis.pruning import export, prune  # noqa: PLC0415
    from analysis.runs import (RunStore, Timer, build_allocation, make_record, nm_allocation,  # noqa: PLC0415
                               prepare_data, write_record)

    nm = _check_prune_args(args)
    torch.manual_seed(args.seed)
    timer = Timer()
    with timer("load"):
        loaded = _load_for_cli(args)
    bos = loaded.info.bos_per_window
    with timer("data"):
        calib, windows, data_info = prepare_data(loaded.tokenizer, args.calib, args.eval, args.nsamples, args.seqlen,
                                                 args.eval_seqlen, args.max_windows, args.seed, bos)
    print(f"calibration {tuple(calib.shape)} from {args.calib}; evaluation {tuple(windows.shape)} from {args.eval}",
          file=sys.stderr)
    with timer("allocation"):
        if nm is None:
            alloc = build_allocation(loaded.model, args.allocation, args.sparsity, calib, epsilon=args.epsilon,
                                     model_name=args.model, progress=_print_progress)
        else:
            alloc = nm_allocation(loaded.model, nm, model_name=args.model)
    with timer("dense_eval"):
        dense = perplexity(loaded.model, windows, progress=_print_ppl("dense"), batch_size=args.batch_size)
    with timer("prune"):
        report = prune(loaded.model, alloc.per_layer, method=args.method, calib=calib, nm=nm, progress=_print_progress)
    with timer("pruned_eval"):
        pruned = perplexity(loaded.model, windows, progress=_print_ppl("pruned"), batch_size=args.batch_size)
    record = make_record(_prune_config(args, nm, alloc, data_info, loaded), alloc.to_dict(), report, dense, pruned,
                         timer.seconds)
    if args.save_model:
        with timer("export"):
            print(f"saved the pruned model to {export(loaded.model, loaded.tokenizer, alloc, args.save_model)}")
        record["saved_to"] = args.save_model
    if args.out:
        print(f"wrote {write_record(record, args.out)}")
    run_id = RunStore(args.db).add(record)
    print(f"{args.method} + {record['config']['allocation']} at {report.overall:.4f} sparsity: perplexity "
          f"{dense:.3f} -> {pruned:.3f} (run {run_id}, prune {report.seconds:.1f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from analysis.evaluation import perplexity  # noqa: PLC0415
    from analysis.pruning import METHODS, prune  # noqa: PLC0415
    from analysis.runs import prepare_data  # noqa: PLC0415

    if args.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}")
    _check_data_args(args, args.text)
    alloc = None
    if args.allocation:
        from analysis.allocation import Allocation  # noqa: PLC0415

        alloc = Allocation.load(args.allocation)
    loaded = _load_for_cli(args)
    calib, windows, _ = prepare_data(loaded.tokenizer, args.calib, args.text, args.nsamples, args.seqlen,
                                     args.eval_seqlen, args.max_windows, args.seed, loaded.info.bos_per_window)
    if alloc is not None:
        report = prune(loaded.model, alloc.per_layer, method=args.method, calib=calib, progress=_print_progress)
        print(f"pruned with {args.method} + {alloc.method}: {report.overall:.4f} sparsity", file=sys.stderr)
    ppl = perplexity(loaded.model, windows, progress=_print_ppl("pruned" if alloc else "dense"), batch_size=args.batch_size)
    print(f"perplexity {ppl:.4f} on {args.text} ({windows.shape[0]} windows of {windows.shape[1]} tokens)")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import pandas as pd  # noqa: PLC0415

    from analysis.runs import RunStore  # noqa: PLC0415

    store = RunStore(args.db)
    if args.show is not None:
        import json  # noqa: PLC0415

        print(json.dumps(store.get(args.show), indent=2))
        return 0
    table = store.all()
    if table.empty:
        print(f"no runs yet in {store.path}")
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    return 0


def _add_data_args(p: argparse.ArgumentParser, eval_flag: str) -> None:
    p.add_argument("--calib", default="default", help="calibration text: default (embedded corpus), wikitext2:valid, "
                   "hf:<dataset>[:<config>]:<split> or a .txt path (same as the evaluation text: split in halves)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument(eval_flag, dest="eval" if eval_flag == "--eval" else "text", default="wikitext2:test",
                   help="evaluation text (same sources as --calib)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation windows per forward pass (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling")


def _add_prune_parsers(sub) -> None:
    from analysis.pruning import METHODS  # noqa: PLC0415

    p = sub.add_parser("prune", help="allocate, prune, evaluate; writes a run record")
    _add_model_args(p)
    p.add_argument("--method", default="wanda", choices=METHODS)
    p.add_argument("--allocation", default="alphapruning",
                   help="uniform, alphapruning, owl, farms, or an allocation JSON file")
    p.add_argument("--sparsity", type=float, default=0.5, help="target fraction of pruned weights, in (0, 0.99]")
    p.add_argument("--epsilon", type=float, default=0.3, help="alphapruning/farms spread")
    p.add_argument("--nm", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (overrides the allocation)")
    _add_data_args(p, "--eval")
    p.add_argument("--save-model", default=None, help="save the pruned model (safetensors + tokenizer + allocation.json)")
    p.add_argument("--out", default=None, help="write the run record JSON here")
    p.add_argument("--db", default=None, help="SQLite run store (default: the cache folder's runs.sqlite)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity of a model, optionally pruned with an allocation JSON")
    _add_model_args(p)
    p.add_argument("--allocation", default=None, help="allocation JSON file to prune with first")
    p.add_argument("--method", default="wanda", choices=METHODS, help="pruner used with --allocation")
    _add_data_args(p, "--text")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("runs", help="list recorded pruning runs")
    p.add_argument("--db", default=None, help="SQLite run store (default: the cache folder's runs.sqlite)")
    p.add_argument("--show", type=int, default=None, help="print the full record of this run id")
    p.set_defaults(func=cmd_runs)


# --------------------------------------------------------------------------------------------
# spectra


def _tqdm_progress(total_label: str):
    """A progress callback drawing one tqdm bar (on stderr) from (message, fraction) calls."""
    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=100, desc=total_label, file=sys.stderr, bar_format="{percentage:3.0f}%|{bar:20}| {desc}")

    def update(message: str, fraction: float) -> None:
        bar.set_description_str(message, refresh=False)
        bar.update(round(100 * fraction) - bar.n)
        if fraction >= 1.0:
            bar.close()
    return update


def _block_summary(metrics):
    """Mean alpha per block and group (attn, mlp, ...), plus the block's mean over all its matrices."""
    m = metrics.assign(where=metrics["block"].map(lambda b: "outside" if b < 0 else b))
    table = m.pivot_table(index="where", columns="group", values="alpha", aggfunc="mean", sort=False)
    table["all"] = m.groupby("where", sort=False)["alpha"].mean()
    table.insert(0, "matrices", m.groupby("where", sort=False).size())
    table.index.name = "block"
    table.columns.name = None
    return table.round(3)


def _write_metrics(metrics, out: str | None, as_json: bool) -> str | None:
    target = sys.stdout if out is None else out
    try:
        if as_json:
            metrics.to_json(target, orient="records", indent=1)
        else:
            metrics.to_csv(target, index=False)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from e
    return out


def cmd_spectra(args: argparse.Namespace) -> int:
    import pandas as pd  # noqa: PLC0415

    from analysis.powerlaw import XMIN_RULES  # noqa: PLC0415
    from analysis.spectra import analyze  # noqa: PLC0415

    if args.fit not in XMIN_RULES:
        raise UsageError(f"--fit must be one of {', '.join(XMIN_RULES)}")
    as_json = args.json or (args.out or "").lower().endswith(".json")
    loaded = _load_for_cli(args)
    result = analyze(loaded.model, fit=args.fit, farms=args.farms, normalize=args.normalize,
                     include_outside=args.include_outside, progress=_tqdm_progress("spectra"))
    metrics = result.metrics
    report = sys.stdout if args.out else sys.stderr  # keep stdout clean when the table goes there
    _write_metrics(metrics, args.out, as_json)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(_block_summary(metrics).to_string(), file=report)
    bad = metrics[metrics["status"] != "ok"]
    for _, row in bad.iterrows():
        print(f"warning: {row['name']}: {row['status']}", file=sys.stderr)
    print(f"{len(metrics)} matrices of {loaded.info.title}, fit={args.fit}{', FARMS' if args.farms else ''}: "
          f"median alpha {metrics['alpha'].median():.3f}" + (f"; wrote {args.out}" if args.out else ""), file=report)
    return 0


def _add_spectra_parser(sub) -> None:
    p = sub.add_parser("spectra", help="ESD heavy-tail metrics (alpha, ...) of every weight matrix to CSV/JSON")
    _add_model_args(p)
    p.add_argument("--out", default=None, help="output file (.csv, or .json); default: CSV on stdout")
    p.add_argument("--fit", default="peak", help="power-law xmin rule: peak (default), median or scan")
    p.add_argument("--farms", action="store_true", help="fit the pooled ESD of square sliding windows (FARMS)")
    p.add_argument("--normalize", action="store_true", help="divide eigenvalues by N (rows)")
    p.add_argument("--include-outside", action="store_true", help="also the embedding and lm_head (not prunable)")
    p.add_argument("--json", action="store_true", help="write JSON records instead of CSV")
    p.set_defaults(func=cmd_spectra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list packaged models (and convert them with --convert)")
    p.add_argument("--convert", action="store_true", help="dequantize the packaged GGUF files into the cache now")
    p.set_defaults(func=cmd_models)
    _add_allocate_parser(sub)
    _add_prune_parsers(sub)
    _add_spectra_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:  # UsageError, AllocationError, ... are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
