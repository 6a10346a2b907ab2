"""The result tables of the docs, generated from bench/results so they cannot drift from the measurements.

    python -m bench.report [--check]

A generated block sits between `<!-- bench.report: KIND MODEL -->` and `<!-- /bench.report -->` in README.md or
bench/SEARCH.md: KIND "summary" (bench.quality.summary: the baselines and two searches per cell) or "full"
(bench.quality.markdown's heading, allocation table and searches table), MODEL a bench/results/quality_MODEL.json.
Without --check the blocks are rewritten in place; with --check nothing is written and the exit status is 1
when a block differs from what the results give.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from bench.quality import markdown, summary

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "bench" / "SEARCH.md")
BLOCK = re.compile(r"(<!-- bench\.report: (\w+) (\w+) -->\n)(.*?)(<!-- /bench\.report -->)", re.S)


def table(kind: str, model: str) -> str:
    """The Markdown of one generated block."""
    results = json.loads((ROOT / "bench" / "results" / f"quality_{model}.json").read_text())
    if kind == "summary":
        return summary(results)
    if kind == "full":  # heading, allocation table, searches table (the per-run timings stay in the JSON)
        blocks = markdown(results).split("\n\n")
        return "\n\n".join([blocks[0], blocks[1], *blocks[3:]])
    raise SystemExit(f"unknown table kind {kind!r} (summary or full)")


def render(text: str) -> str:
    """`text` with every generated block rewritten."""
    return BLOCK.sub(lambda m: f"{m[1]}\n{table(m[2], m[3])}\n\n{m[5]}", text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only say whether the docs match bench/results")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        old = doc.read_text()
        new = render(old)
        if new != old:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"out of date with bench/results: {', '.join(map(str, stale))} (run python -m bench.report)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
