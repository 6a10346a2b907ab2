"""The `spectra` command: heavy-tail metrics of every weight matrix, streamed from a checkpoint where it can be."""
from __future__ import annotations

import argparse
import sys

import pandas as pd
from tqdm import tqdm

from analysis.cli.checks import checked_table_out, note_not_loaded, write_esds, write_table
from analysis.cli.options import (
    UsageError,
    add_command,
    add_model_args,
    load_checked,
    model_settings,
    refuse_unused,
    typed_flags,
)
from analysis.loading import resolve_source, streamable_folder
from analysis.powerlaw import XMIN_RULES
from analysis.settings import SpectraSettings
from analysis.spectra import ALPHA_BANDS, NotStreamable, alpha_summary, analyze, analyze_checkpoint


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


def cmd_spectra(args: argparse.Namespace) -> int:
    if args.fit != "scan":
        refuse_unused(typed_flags(args, "--min-tail"), f"only the scan fit reads it, and the fit is {args.fit}")
    settings = SpectraSettings(args.fit, args.farms, args.normalize, args.include_outside, args.min_tail).check()
    if args.esds and not args.esds.lower().endswith(".npz"):
        raise UsageError(f"--esds: {args.esds}: the eigenvalues are written as NumPy's .npz; name the file .npz")
    as_json = checked_table_out(args, {"--esds": args.esds}) or args.json  # (checked with --json too)
    model = model_settings(args).check()
    # a packaged model's converted folder, a local folder, a hub id's snapshot in the local cache; checked (headers
    # only) before the progress bar appears
    folder = streamable_folder(model.source, model.trust_remote_code)
    kwargs = dict(fit=settings.fit, farms=settings.farms, normalize=settings.normalize,
                  include_outside=settings.include_outside, min_tail=settings.min_tail,
                  progress=_tqdm_progress("spectra"))
    result = None
    if folder is not None:  # streamed from the shards, no model load; cached by the checkpoint's content
        try:
            result = analyze_checkpoint(folder, device=model.device, **kwargs)
            title = resolve_source(model.source)[1]
            note_not_loaded(args, "its matrices were streamed from the checkpoint's shards, in their stored dtype")
        except NotStreamable:
            pass
    if result is None:
        loaded = load_checked(model, tokenizer=False)
        result, title = analyze(loaded.model, **kwargs), loaded.info.title
    metrics, table = result.metrics, result.table()  # the table: each row with its fit's trust and the settings
    report = sys.stdout if args.out else sys.stderr  # keep stdout clean when the table goes there
    write_table(table, args.out, as_json)
    if args.esds:
        write_esds(result, args.esds)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(_block_summary(metrics).to_string(), file=report)
    for status, names in metrics[metrics["status"] != "ok"].groupby("status")["name"]:  # one line per status
        names = names.tolist()
        print(f"warning: {names[0]}: {status}" if len(names) == 1 else
              f"warning: {len(names)} matrices: {status} (e.g. {names[0]}; the status column names them)",
              file=sys.stderr)
    read = alpha_summary(table)  # the Spectra page's reading, of the prunable matrices fitted
    low, high = ALPHA_BANDS
    print(f"{len(metrics)} matrices of {title}, fit={settings.fit}{', FARMS' if settings.farms else ''}: "
          f"median alpha {metrics['alpha'].median():.3f}; of {read['fitted']} prunable fitted, {read['inside']} in "
          f"[{low:g}, {high:g}] and {read['with_tail']} with a tail beyond MP"
          + (" (from the cache)" if result.cached else "")
          + (f"; wrote {args.out}" if args.out else ""), file=report)
    return 0


def add_spectra_parser(sub) -> None:
    d = SpectraSettings()
    p = add_command(sub, "spectra", "ESD heavy-tail metrics (alpha, ...) of every weight matrix to CSV/JSON; a "
                    "safetensors checkpoint is streamed matrix by matrix (no model load, --dtype unused) and cached")
    add_model_args(p)
    p.add_argument("--out", default=None, help="output file (.csv, or .json); default: CSV on stdout")
    p.add_argument("--fit", default=d.fit, help=f"power-law xmin rule: {', '.join(XMIN_RULES)}")
    p.add_argument("--farms", action="store_true", help="fit the pooled ESD of square sliding windows (FARMS)")
    p.add_argument("--normalize", action="store_true",
                   help="divide eigenvalues by N = max(rows, cols), the long side (as weightwatcher; with --farms "
                        "the pooled ESD by its windows' side)")
    p.add_argument("--min-tail", type=int, default=d.min_tail,
                   help=f"smallest tail the scan fit may choose (default {d.min_tail}; 2 is weightwatcher's)")
    p.add_argument("--include-outside", action="store_true", help="also the embedding and lm_head (not prunable)")
    p.add_argument("--json", action="store_true", help="write JSON records instead of CSV")
    p.add_argument("--esds", default=None, metavar="FILE.npz",
                   help="also every matrix's eigenvalues (ascending; FARMS's pooled windows'), keyed by its name")
    p.set_defaults(func=cmd_spectra)
