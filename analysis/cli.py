"""Command line: `python -m analysis <command> ...`. Every dashboard action has a command here.

Errors the user can fix exit with status 2 and one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list packaged models (and convert them with --convert)")
    p.add_argument("--convert", action="store_true", help="dequantize the packaged GGUF files into the cache now")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, UsageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
