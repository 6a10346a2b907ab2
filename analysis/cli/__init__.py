"""Command line: `python -m analysis <command> ...`. Every dashboard action has a command here.

Option defaults are read from analysis.settings. Errors the user can fix exit with status 2 and one
line on stderr, never a traceback; options are checked before any model loads.
"""
from __future__ import annotations

import argparse
import os
import sys

from analysis.cli.allocate import add_allocate_parser, add_export_parser
from analysis.cli.options import FLAGS, SWEEP_FLAGS, add_command
from analysis.cli.prune import add_prune_parsers
from analysis.cli.spectra import add_spectra_parser
from analysis.cli.sweep import add_sweep_parser
from analysis.loading import PACKAGED, ModelLoadError, ensure_converted
from analysis.settings import SettingsError
from analysis.store import StoreError

# each command's older name of an option -> the name every command now shares (both are accepted)
OLD_NAMES = {"prune": {"--method": "--pruner"}, "eval": {"--method": "--pruner"}, "sweep": {"--methods": "--pruners"},
             "allocate": {"--method": "--allocation"}}
OTHER_NAMES = {"eval": {"--eval": "--text"}}  # two current names of one option (kept as typed: messages use it)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`error: ...`, exit status 2) like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def cmd_models(args: argparse.Namespace) -> int:
    for key, pm in PACKAGED.items():
        line = f"{key:10s} {pm.title:28s} {pm.quantization}"
        if args.convert:
            line += f"  -> {ensure_converted(key)}"
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m analysis", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_command(sub, "models", "list packaged models (and convert them with --convert)")
    p.add_argument("--convert", action="store_true", help="dequantize the packaged GGUF files into the cache now")
    p.set_defaults(func=cmd_models)
    add_allocate_parser(sub)
    add_export_parser(sub)
    add_prune_parsers(sub)
    add_spectra_parser(sub)
    add_sweep_parser(sub)
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
